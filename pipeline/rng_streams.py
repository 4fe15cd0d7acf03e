"""The RNG stream ids, named once. Every random draw of a run is seeded by its own numpy
SeedSequence key, [seed, stream id, ...], so two draws never share random numbers and adding a draw
never shifts another. A new draw takes an id not listed here.

Two draws share id 11 (kept: changing either would change what finished runs drew); their keys
differ in shape, so they never coincide: [seed, 11] (the dry run) and
[seed, user, position, epoch, 11] (the learnability check). Likewise the training samplers' own
keys are [seed, user, position] (`rerank.training.samples`), no stream id at all.
"""
from __future__ import annotations

SAMPLE_CAP = 1  # which training prompts are kept when reranker.max_train_samples caps them
VAL_USERS = 2  # the validation users that training-time validation ranks (reranker.val_max_users)
VAL_SHUFFLE = 3  # each validation user's shuffled candidate order (eval_shuffled_* metrics)
ANALYSIS_USERS = 3  # the covered users an analysis samples from a finished run (key [seed, 3], as VAL_SHUFFLE's differs)
BENCHMARK_USERS = 4  # the users a benchmark times
EPOCH_ORDER = 7  # each training prompt's candidate order in each epoch (reranker.reshuffle_each_epoch)
DRY_RUN_SAMPLE = 11  # the prompts a dry run tokenizes to measure lengths
OVERFIT_ORDERS = 11  # the learnability check's fresh scoring orders (see above)
CALIBRATION_USERS = 17  # the validation users whose permuted orders estimate the position prior
BINDING_MIX = 19  # which training prompts are shown as copy prompts in each epoch (reranker.binding_mix_epochs)
