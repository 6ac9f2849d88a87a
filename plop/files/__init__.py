"""Task data: the rows plop reads (local files, the hub, the demo rows, TRL's dataset formats), sampled
with one seeded rule and turned into prompt/response examples."""
