"""The transformers engine: batched, prefix-shared sampling and batched reward scoring, CPU or GPU."""
