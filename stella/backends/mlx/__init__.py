"""The in-process MLX backend (kind "mlx")."""

from stella.backends.mlx.backend import MlxBackend, MlxConfig

__all__ = ["MlxBackend", "MlxConfig"]
