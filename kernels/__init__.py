"""Attention and MoE kernels as torch.library custom ops, each beside its plain-torch reference."""
