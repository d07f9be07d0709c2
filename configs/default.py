"""Shared defaults: every named config starts from these and changes what it needs."""
from __future__ import annotations

import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
    """The full set of keys a run is described by (data, SDE, model, training, sampling, likelihood, seed)."""
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.device = "auto"  # "auto" picks CUDA when present, else CPU

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "ring2d"  # toy name, "digits", "cifar10" or "image_folder"
    data.kind = "toy"  # "toy" (vectors in data space) or "image" (uint8 images scaled to the model range)
    data.path = ""  # location of image data (CIFAR-10 folder / npz parts, image folder)
    data.dim = 2  # vector dimension for toy data
    data.image_size = 32
    data.num_channels = 3
    data.centered = False  # images scaled to [-1, 1] if True, else [0, 1]
    data.uniform_dequantization = False
    data.random_flip = False
    data.num_classes = 0

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vpsde"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0
    sde.num_scales = 1000

    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"
    model.hidden_dim = 128  # MLP width (toy main job: ~2 min on two CPU cores)
    model.num_layers = 3
    model.embedding_dim = 64
    model.ema_rate = 0.999
    model.scale_by_sigma = False
    # what the network output estimates (models/parameterization.py): "score" (the reference convention: -eps for
    # VP / sub-VP, the score for VE), "eps", "x0", "v" or "edm" (Karras et al. 2022 preconditioning with sigma_data)
    model.parameterization = "score"
    model.sigma_data = 0.5
    model.dropout = 0.0
    # noise-label embedding: "auto" (fourier for vesde, else positional), "fourier", "positional"
    model.embedding_type = "auto"
    model.fourier_scale = 16.0
    # U-Nets (ddpmpp / ncsnpp / ddpm / ncsnv2); reference values per CIFAR config in docs/MODELS.md
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = (1, 3, 3, 1)
    model.skip_rescale = True
    model.resblock_type = "biggan"  # "biggan" or "ddpm"
    model.progressive = "none"  # "none", "output_skip", "residual"
    model.progressive_input = "none"  # "none", "input_skip", "residual"
    model.progressive_combine = "sum"  # "sum" or "cat"
    model.init_scale = 0.0
    model.conv_size = 3
    model.nonlinearity = "swish"  # "swish", "elu", "relu", "lrelu"
    # class-conditional networks (data.num_classes > 0): probability of replacing the label by the null class
    # num_classes during training, so that one network learns p(x | c) and p(x) (classifier-free guidance)
    model.p_uncond = 0.1

    config.training = training = ml_collections.ConfigDict()
    training.continuous = True
    training.reduce_mean = False
    training.likelihood_weighting = False
    training.importance_sampling = False
    training.eps = 1e-5  # smallest t used by the loss
    # DSM weighting (training/weightings.py): "sigma2" (lambda = std^2, default), "likelihood" (the same as
    # likelihood_weighting=true), "edm" (Karras et al. 2022 lambda(sigma), sigma_data = model.sigma_data) or "min_snr"
    # (min(SNR, gamma) / SNR, gamma = min_snr_gamma); proposal of t for edm / min_snr: "auto" (lognormal for edm,
    # uniform for min_snr), "uniform" or "lognormal" (ln sigma ~ N(p_mean, p_std^2) truncated to the SDE's range)
    training.weighting = "sigma2"
    training.proposal = "auto"
    training.p_mean = -1.2
    training.p_std = 1.2
    training.min_snr_gamma = 5.0
    training.batch_size = 512
    training.n_iters = 3000
    training.lr = 2e-3
    training.weight_decay = 0.0
    training.warmup = 100
    training.grad_clip = 1.0
    training.log_every = 100
    training.snapshot_every = 500
    training.sample_every = 0  # 0: sample figure at the end only
    training.bf16 = True  # autocast on CUDA only; CPU trains in float32
    training.compile = False
    # "auto": continuous DSM, or DDPM (VP) / SMLD (VE) when training.continuous is false; "ssm": sliced SM
    training.loss = "auto"
    training.n_projections = 1  # random projections per sample for sliced score matching
    training.plot_samples = 2000  # samples drawn for the figure at sample_every and at the end (0: none)
    training.data_on_device = True  # keep uint8 images on the GPU and dequantize/flip there
    training.progress = True  # tqdm bar

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.solver = "em"
    sampling.nfe = 500
    sampling.num_samples = 2000
    sampling.eps = 1e-3
    sampling.batch_size = 2000
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.n_steps_each = 1  # corrector (Langevin) steps per predictor step: the samplers' `corrector_steps`
    # For the samplers that take them (None: the sampler's own default): `method` of ode (dopri5, ..., euler,
    # midpoint, rk4), ode_scipy (RK45, RK23, DOP853) and sde_torchsde (euler, milstein, ...); `rtol` / `atol`
    # of the adaptive ones (ode, ode_scipy: 1e-5 / 1e-5; adaptive: 0.05 / 0.0078). sampling.nfe caps those.
    sampling.method = None
    sampling.rtol = None
    sampling.atol = None
    sampling.noise_removal = True
    # edm_stochastic (Karras et al. 2022, algorithm 2): S_churn, S_tmin, S_tmax, S_noise (None: 0, 0, inf, 1 = heun)
    sampling.s_churn = None
    sampling.s_tmin = None
    sampling.s_tmax = None
    sampling.s_noise = None
    sampling.compile = False  # torch.compile the network for sampling (solvers/accel.py)
    sampling.cuda_graph = False  # replay the network from a CUDA graph (fixed-shape loops; no-op on CPU)

    config.likelihood = likelihood = ml_collections.ConfigDict()
    likelihood.eps = 1e-5
    likelihood.method = "dopri5"
    likelihood.rtol = 1e-5
    likelihood.atol = 1e-5
    # error norm of the adaptive step (likelihood.ode): "per_dim" holds log p to the tolerance per data dimension
    # (the scale of bits/dim), "max_rms" is torchdiffeq's norm (the old default), "joint_rms" scipy's
    likelihood.error_norm = "per_dim"
    likelihood.divergence = "hutchinson_rademacher"  # or exact, hutchinson_gaussian, hutchpp, hutchpp_plain
    likelihood.n_probes = 1  # probes per evaluation (Hutch++: sketch size k, 3k VJPs)
    likelihood.num_dequant = 1
    likelihood.batch_size = 500
    likelihood.split = "test"
    likelihood.num_batches = 0  # batches to evaluate (0 = the whole split; toys: toy_num_samples points)
    likelihood.toy_num_samples = 2000  # size of a toy split (fixed exact samples per seed and split)
    # Evaluate the network as a continuous-time score for the PF-ODE whatever its training (the reference's
    # likelihood code: get_score_fn(..., continuous=True)): a discrete VP model gets 999 t and the marginal std
    # (the DDPM network's labels t (N - 1) are the same numbers for N = 1000); false keeps the step-wise
    # discrete score (DDPM's std at labels.long(), SMLD's nearest level), whose ODE drift jumps at every step.
    likelihood.continuous_score = True
    likelihood.ddpm_bound = False  # also the DDPM variational bound (discrete-time VP models only)
    likelihood.ddpm_variance = "fixedlarge"  # decoder/reverse variances: "fixedlarge" (beta_t) or "fixedsmall"
    likelihood.ddpm_num_terms = 0  # KL terms per image (0 = all N-1; K > 0 = unbiased estimate from K)

    # image sample quality (evaluation/image_eval.py): FID, KID, IS with the standard FID Inception
    config.eval = ev = ml_collections.ConfigDict()
    ev.inception_weights = ""  # a local weights file; "" = torch hub's cache (downloaded there when online)
    ev.split = "train"  # data split of the reference statistics (--split overrides)
    ev.reference_num_images = 0  # images of that split for the reference statistics (0 = all)
    ev.stats_dir = ""  # where reference statistics are cached ("" = next to the data; see README)
    ev.batch_size = 50  # images per Inception batch
    ev.kid_subsets = 100  # KID: number of random subsets (Binkowski et al., 2018)
    ev.kid_subset_size = 1000  # KID: rows per subset (fewer when a set is smaller)
    ev.kid_reference_features = 10000  # reference pool features kept in the cache for KID
    ev.isc_splits = 10  # Inception Score: number of parts (fewer when there are fewer samples)
    ev.fid_every = 0  # training: FID/KID/IS every K steps and at the end (0 = off)
    ev.fid_num_samples = 1000  # training: samples drawn for each of those evaluations

    # noise-conditional classifier p_t(c | x) for classifier guidance (`--mode train_classifier`)
    config.classifier = classifier = ml_collections.ConfigDict()
    classifier.hidden_dim = 256
    classifier.num_layers = 3
    classifier.embedding_dim = 64
    classifier.batch_size = 256
    classifier.n_iters = 2000
    classifier.lr = 1e-3
    classifier.eps = 1e-5  # smallest t of the perturbed training data (as training.eps)
    classifier.log_every = 200
    return config
