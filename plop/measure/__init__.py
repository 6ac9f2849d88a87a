"""Measuring: the NFN math, the forward-hook collector and its batches, MoE experts, encoder-decoder
inputs, data-parallel passes over several processes, and the data-free weight scores."""
