"""Per-family glue between configs, data, models and the generic `Trainer`."""
