"""Data: analytic Gaussian mixtures (exact scores), 2-D toys, small image sets, scaling."""
from data.digits import load_digits_uint8
from data.mixtures import TOY_MIXTURES, GaussianMixture, toy_mixture
from data.toys import SAMPLE_TOYS, sample_toy
from data.transforms import get_data_inverse_scaler, get_data_scaler

__all__ = ["GaussianMixture", "toy_mixture", "TOY_MIXTURES", "SAMPLE_TOYS", "sample_toy",
           "load_digits_uint8", "get_data_scaler", "get_data_inverse_scaler"]
