"""`bon eval`: what best-of-N and RAFT buy in reward and win rate, and cost in KL and diversity."""
