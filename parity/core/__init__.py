"""Layer 1 (lowest above errors): the one subprocess runner (proc), filesystem helpers and the one atomic
writer (fs), where things live (paths), and the one downloader with its progress display (download).
Imports only parity.errors.
"""
