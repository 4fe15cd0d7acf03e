"""The paper's Table 1 and Table 3, rebuilt from run directories, with its published numbers beside ours.

read.py reads and checks the runs, group.py groups them by dataset and method, build.py builds the
tables as data frames (convergence.py: how each retriever's training ended), render.py writes them
(cells.py: their cells).

- Table 1 (all test users): one row per retriever (metrics.json `retriever`: full catalogue,
  history masked) and one per reranker run (`overall`: coverage-weighted), MRR/NDCG/Recall @5 and
  @10. The paper's baselines that were not given get a "not run" row, so a gap is visible.
- Table 3 (covered users): per reranker run, its retriever's order (`retriever_subset`) -> the
  reranker (`subset`), with the relative improvement.
- Significance: per reranker run, a paired bootstrap over users of reranker - retriever
  (analysis/significance.py), on the covered subset and overall.

Runs are grouped by their data section (different data, different table). Within a dataset, runs
of one method with different seeds form one row, with mean ± sample standard deviation (n - 1)
and n: retriever runs whose retriever section is the same but for `seed` (and `device`), and
reranker runs whose retriever is such a method and whose reranker section is the same but for
bookkeeping keys (`RERANKER_BOOKKEEPING`). Two runs of one method with the same seed are refused
(one would count twice). Table 3's relative improvement is that of the means; the significance
tests stay per run. Every number comes from the runs' metrics.json, except the per-user values of
the significance test, which come from rankings_<split>.jsonl and are checked against
metrics.json. Inputs are read only; nothing is written until every run has been read and checked.
"""
