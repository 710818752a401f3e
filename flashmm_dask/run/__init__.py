"""The main job: config -> cluster -> one pass of statistics -> feature blocks -> results.

config, config_rules     YAML run configurations, validated on load
cluster, cluster_checks  Dask clients: local, Slurm (dask-jobqueue), existing scheduler
kube                     the DaskCluster spec for the Dask Kubernetes operator
pipeline                 the run itself; pipeline_strata for strata, selections, filters
worker                   the task a worker runs on one block of features
strata_store             the stratified run's results groups and their block tasks
output                   the output folder: names, lock, owned files, write failures
features, stored_model   gene selection; the model that saved statistics were made for
retest                   new contrasts on a finished store
progress                 progress bars and log lines of long phases
"""
