"""`peftkit report`: a comparison's `runs.jsonl` turned into the files that publish it, beside
it. Each module does one job:

- `write`: `write_report`, the entry point (`peftkit report`), every file below in turn;
- `rows`: the records as one row per strategy (seeds aggregated, today's memory estimate,
  the Pareto frontier, the metric a table leads with);
- `tables`: results.md, results.csv and results.json, and the provenance lines;
- `plots`: three PNGs (metric vs trainable parameters with the frontier, peak memory,
  training time), matplotlib loaded only to draw them;
- `html`: results.html, the table and the plots on one self-contained page;
- `generations`: generations.md, every row's answers to the same inputs, where the task
  saves answers (instruction tuning, summarization, extractive QA).

This package imports nothing itself, so that importing one of its modules loads that module
and what it needs, and no module here imports its package back.
"""
