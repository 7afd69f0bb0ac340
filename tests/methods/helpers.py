import torch

from prune_cli.calibrators.stats import InputStats, Stat

ALL = frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM})


def correlated_inputs(n: int, features: int, seed: int = 0, mean_shift: float = 0.5) -> torch.Tensor:
    """Tokens with correlated channels, unequal scales and non-zero means, ``(n, features)``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5 + torch.eye(features)
    scales = torch.linspace(0.2, 3.0, features)
    return (torch.randn(n, features, generator=g) @ mix) * scales + mean_shift * torch.randn(features, generator=g)


def stats_for(x: torch.Tensor, tokens_per_window: int = 1) -> InputStats:
    s = InputStats(x.shape[-1], ALL, tokens_per_window=tokens_per_window)
    s.update(x)
    return s


def recon_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_hat) @ x.T).pow(2).sum())
