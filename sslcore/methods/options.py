"""Every registered method's options and their domains (option -> annotation), for the CLI to check
``-o KEY=VALUE`` without importing the methods.  Generated from their signatures by
``python -m sslcore.methods.options`` (tests/test_cli.py says when it is stale); do not edit.
"""
from typing import Annotated, Literal

from ..checks import (
    Backend,
    Fraction,
    LayerCount,
    NonNegative,
    NonNegativeInt,
    PositiveInt,
    Probability,
    QueueSize,
    Range,
    Seed,
    Temperature,
    UnitInterval,
    Width,
)

OPTIONS = {
    'simclr': {
        'backend': Backend,
        'gather_distributed': bool | Literal['ring'],
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'temperature': Temperature,
    },
    'mae': {
        'decoder_depth': LayerCount,
        'decoder_dim': Width,
        'decoder_heads': LayerCount,
        'mask_ratio': Fraction,
        'min_patch_std': NonNegative,
        'norm_pix_loss': bool,
        'patch_size': PositiveInt | None,
    },
    'clustermim': {
        'backend': Backend,
        'decoder_depth': LayerCount,
        'decoder_dim': Width,
        'decoder_heads': LayerCount,
        'label_smoothing': UnitInterval,
        'mask_ratio': Fraction,
        'n_clusters': Width | None,
        'patch_size': PositiveInt | None,
        'seed': Seed,
        'tokenizer': str,
    },
    'moco': {
        'backend': Backend,
        'gather_distributed': bool | Literal['ring'],
        'momentum': UnitInterval,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'queue_size': QueueSize,
        'symmetric': bool,
        'temperature': Temperature,
    },
    'simsiam': {
        'pred_hidden': Width | None,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
    },
    'arcl': {
        'backend': Backend,
        'base': Literal['simclr', 'moco'],
        'gather_distributed': bool | Literal['ring'],
        'mode': Literal['worst_pair', 'penalty'],
        'momentum': UnitInterval | None,
        'penalty': NonNegative,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'queue_size': QueueSize | None,
        'symmetric': bool | None,
        'temperature': Temperature | None,
        'views': Annotated[int, Range(low=2, high=64, low_open=False, high_open=False)],
    },
    'simclr-attn': {
        'backend': Backend,
        'gather_distributed': bool | Literal['ring'],
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'temperature': Temperature,
        'weighting': Literal['row', 'alignment'],
    },
    'simsiam-multi': {
        'gather_distributed': bool,
        'mix': UnitInterval,
        'mix_epoch': PositiveInt,
        'pred_hidden': Width | None,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
    },
    'nnclr': {
        'backend': Backend,
        'gather_distributed': bool | Literal['ring'],
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'queue_size': QueueSize,
        'temperature': Temperature,
    },
    'byol': {
        'momentum': UnitInterval,
        'pred_hidden': Width | None,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
    },
    'mocov3': {
        'backend': Backend,
        'gather_distributed': bool | Literal['ring'],
        'momentum': UnitInterval,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
        'proj_layers': PositiveInt | None,
        'temperature': Temperature | None,
    },
    'dino': {
        'bottleneck': Width | None,
        'center_momentum': UnitInterval,
        'hidden': Width | None,
        'local_crops': Annotated[int, Range(low=0, high=64, low_open=False, high_open=False)],
        'momentum': UnitInterval,
        'out_dim': QueueSize | None,
        'student_temp': Temperature,
        'teacher_temp': Temperature,
        'warmup_teacher_temp': Temperature,
        'warmup_teacher_temp_epochs': NonNegativeInt,
    },
    'barlowtwins': {
        'gather_distributed': bool,
        'lambda_param': NonNegative,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
    },
    'vicreg': {
        'gather_distributed': bool,
        'lambda_param': NonNegative,
        'mu_param': NonNegative,
        'nu_param': NonNegative,
        'proj_dim': Width | None,
        'proj_hidden': Width | None,
    },
    'ar': {
        'eval_samples': PositiveInt,
        'left_to_right': bool,
        'pool': Literal['mean', 'first', 'last'],
        'prompts': tuple[Fraction | PositiveInt, ...] | Fraction | PositiveInt,
    },
    'mlm': {
        'eval_samples': PositiveInt,
        'left_to_right': bool,
        'mask_ratio': Fraction | None,
        'pool': Literal['mean', 'first', 'last'],
        'prompts': tuple[Fraction | PositiveInt, ...] | Fraction | PositiveInt,
    },
    'dear': {
        'eval_samples': PositiveInt,
        'left_to_right': bool,
        'max_offset': PositiveInt,
        'pool': Literal['mean', 'first', 'last'],
        'prompts': tuple[Fraction | PositiveInt, ...] | Fraction | PositiveInt,
    },
    'vlm': {
        'eval_samples': PositiveInt,
        'left_to_right': bool,
        'max_ratio': Fraction,
        'min_ratio': Fraction,
        'pool': Literal['mean', 'first', 'last'],
        'prompts': tuple[Fraction | PositiveInt, ...] | Fraction | PositiveInt,
        'suffix_prob': Probability,
    },
}

if __name__ == "__main__":  # regenerate this file
    from pathlib import Path

    from sslcore.methods import option_table_source

    Path(__file__).write_text(option_table_source())
