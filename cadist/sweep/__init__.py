"""Sweeps (Ray Tune): the sweep file, trials as ordinary jobs run by the training driver, planning,
results and the Pareto front. Imports train, cluster, tracking, results, storage, config."""
