"""FL-GLM split learning: model segments, the split server and client, their wire."""
