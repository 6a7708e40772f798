"""Record-level differential privacy: the mechanisms that release something derived from a
client's records, their accounting per client (the ledger) and the empirical audit."""
