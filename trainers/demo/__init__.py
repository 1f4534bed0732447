"""The demo suite and `bon demo`: the whole serve -> log -> RAFT -> reload loop on CPU, from scratch."""
