"""The main job: config -> cluster -> one pass of statistics -> feature blocks -> results.

config, config_rules     YAML run configurations, validated on load
cluster, cluster_checks  Dask clients: local, Slurm (dask-jobqueue), existing scheduler
kube                     the DaskCluster spec for the Dask Kubernetes operator
steps                    read -> check obs -> design -> PCs: the steps flashmm() walks too
inputs                   a run's checked inputs and its statistics (plain or strata)
pipeline, flow           the run itself, one skeleton; pipeline_strata: strata, selections
blocks, worker           the feature blocks of a store; the task a worker runs on one
strata_store             the stratified run's results groups and their block tasks
strata_cluster           the strata's statistics left on the workers, saved from there
output, summary          the output folder (names, lock, outputs); what a run did
commands                 the work of `flashmm-dask stats` and `flashmm-dask test`
features, stored_model   gene selection; the model that saved statistics were made for
retest                   new contrasts on a finished store
progress                 progress bars and log lines of long phases
"""
