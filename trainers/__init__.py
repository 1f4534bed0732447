"""bon's trainers: one readable recipe per method (sft, reward, raft) on shared components.

Each recipe runs on accelerate, so `accelerate launch` and `torchrun` work unchanged on many
processes. Trainers may use `server`'s inference core (model loading, reward read-out, decoding);
the server never imports this package.
"""
