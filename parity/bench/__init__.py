"""`parity bench`: command (its parser), main (the run), inputs (models and implementations), lanes (what is timed), gate
(statistics, baselines, the regression gate), llama_bench (the cross-check), report (text and HTML). Imports
parity.check and below.
"""
