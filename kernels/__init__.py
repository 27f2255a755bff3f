"""Fused Triton kernels for adapter layers, with torch references and a dispatch."""
