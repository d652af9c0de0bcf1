"""Reward models: a common contract, a registry, published scorers, combination and file scoring.

    from flowalign.rewards import load_reward, RewardCombiner, parse_weights
    reward = load_reward("pickscore", device="cuda", dtype=torch.bfloat16)
    scores = reward.score(images, prompts)        # {"pickscore": Tensor[B]}

Scorer modules (open_clip / transformers backbones) are imported only when a scorer is loaded.
"""

from flowalign.rewards.base import RewardInputError, RewardModel, TextEmbeddingCache, validate_media
from flowalign.rewards.combine import (
    RewardCombiner,
    load_normalisation,
    parse_weights,
    save_normalisation,
    stats_from_scores,
)
from flowalign.rewards.preprocess import ImagePreprocess, preprocess_images
from flowalign.rewards.registry import available_rewards, load_reward, parse_reward_spec, register_reward

__all__ = [
    "ImagePreprocess",
    "RewardCombiner",
    "RewardInputError",
    "RewardModel",
    "TextEmbeddingCache",
    "available_rewards",
    "load_normalisation",
    "load_reward",
    "parse_reward_spec",
    "parse_weights",
    "preprocess_images",
    "register_reward",
    "save_normalisation",
    "stats_from_scores",
    "validate_media",
]
