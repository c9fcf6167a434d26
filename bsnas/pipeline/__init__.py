"""The end-to-end pipeline on top of training and search: the whole run (`run`),
retraining a found architecture (`retrain`), the run's report (`report`) and every plot
(`plots`)."""
