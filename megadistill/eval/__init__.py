"""Evaluation of generated latents: feature extraction and quality metrics (FD, prompt
adherence, temporal error) for the synthetic video-latent world."""
from megadistill.eval.features import (BlobTracks, LatentFeatureExtractor, decode_blobs,
                                       feature_extractor, fit_gaussians, fit_lines)
from megadistill.eval.metrics import (evaluate, frechet_distance, frechet_distance_inf, noise_floor_fd,
                                      prompt_adherence, temporal_error)

__all__ = ["BlobTracks", "LatentFeatureExtractor", "decode_blobs", "feature_extractor",
           "fit_gaussians", "fit_lines", "evaluate", "frechet_distance", "frechet_distance_inf", "noise_floor_fd",
           "prompt_adherence", "temporal_error"]
