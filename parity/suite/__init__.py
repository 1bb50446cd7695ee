"""`parity suite`: an implementation against a reference over a corpus (issue 16; docs/ARCHITECTURE.md).

Modules: `inputs` (a prompts JSONL or a text cut into chunks -> items of token ids), `sides` (a picklable
recipe that opens one side, implementation or reference, wherever a worker runs; one item evaluated on both
sides and reduced at once to per-position arrays by `stats`), `stats` (llama-perplexity's KL-divergence
definitions: per-position arrays, `summarize`, `format`, scoring modes), `store` (the out directory: the
manifest, one atomically written file per finished item, resume, merge of shards), `executors` (local worker
processes, Ray actors), `verdicts` (per-item verdicts, worst items, the histogram), `receipt` (suite.json,
parity/schema/suite.schema.json, and the text summary), `report` (the HTML page), `command` (the CLI).
"""
