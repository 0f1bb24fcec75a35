"""The configs every data set shares: `get_config(arg, data_set=...)` is the paper's protocol ('') or a
CPU-sized variant, for one registered data set (`fgpair_jax/data/sources.py`).

The data set's own files (`configs/cub.py`, `configs/cars.py`, `configs/aircraft.py`, `configs/image_folder.py`)
call it with their name and default folder; run those, not this one:
    python -m fgpair_jax.main --config=configs/cars.py[:quick] --config.data.manual_dir=DIR --workdir=W
Every knob has its default and a one-line reason next to it. "Paper" values follow LCR (CVPR 2023),
whose protocol the fgpair paper shares and which uses one recipe for CUB, Cars and Aircraft; choices the
paper does not fix are marked "our reading".
"""
import ml_collections

SCRATCH_EPOCHS = 40  # `scratch`: chosen on CUB's validation split (results/README.md, test bed)
VARIANTS = ("paper", "quick", "medium", "scratch", "tiny")


def get_config(arg: str = "", *, data_set: str = "cub", manual_dir: str = "",
               config_file: str = "configs/cub.py") -> ml_collections.ConfigDict:
    """`arg`: '' (paper protocol: ImageNet ResNet-50 at 224 px; add --config.model.dtype=bfloat16 on a
    GPU/TPU), 'quick' (CPU-sized, minutes end to end), 'medium' (quick trained 16 epochs with ImageNet's
    BN statistics kept and a 2 + 2 epoch warm-up and ramp: long enough for the synthesized pairs to act,
    for studies on a CPU), 'scratch' (the CPU test bed: ResNet-18 from random init at 80 px, MoCo v2
    with a 1,024-key queue; no ImageNet start for SSL to erode) or 'tiny' (8-channel ResNet, 32 px, one epoch: the one
    config of the tests, the smoke runs and the kill harness; seconds on their `data/synthetic.py` folders,
    minutes on the CUB subset it reads by default).

    Raises:
      ValueError: any other `arg`.
    """
    variant = arg or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"{config_file} has no variant {arg!r}: use one of {', '.join(VARIANTS)} "
                         f"(e.g. --config={config_file}:quick; no variant is the paper's protocol).")

    c = ml_collections.ConfigDict()
    c.method = "fgpair"  # SSL method: fgpair (the paper) | moco | lcr | simsiam | byol
    c.seed = 0  # one seed drives init, data order, augmentation
    c.num_epochs = 100  # paper: 100 epochs
    c.global_batch_size = 128  # paper: 128, summed over all devices and hosts

    c.data = ml_collections.ConfigDict()
    c.data.name = data_set  # data set: cub | cars | aircraft | image_folder (README: Data sets)
    c.data.manual_dir = manual_dir  # its folder in the official layout, or the official archive(s)
    c.data.download = False  # True: fetch the official archive once into data_dir (CUB, Aircraft), MD5-checked
    c.data.data_dir = ""  # where TFDS writes the build: '' = $TFDS_DATA_DIR or ~/tensorflow_datasets (shared)
    c.data.image_size = 224  # training and evaluation resolution (paper: 224)
    c.data.crop_scale_min = 0.2  # RandomResizedCrop lower area bound (MoCo v2: 0.2)
    c.data.eval_crop_fraction = 0.875  # eval and figures: shorter side to size/0.875, centre crop (224 <- 256)
    c.data.eval_split = "test"  # test (final runs) | val: tune on a held-out part of train, never on test
    c.data.val_fraction = 0.1  # eval_split=val: share of each class of train held out (fixed draw)
    c.data.worker_count = -1  # grain worker processes decoding on the host: -1 = one per core on a GPU/TPU, none on a CPU (XLA uses the cores)
    c.data.view_resize = "pil"  # training views' resampling: pil (torchvision's PIL path) | opencv (~6x cheaper host work at 224 px)
    c.data.stored_short_side = 0  # build option: 0 = images as they are | S = stored with shorter side <= S px (>= image_size; 256 for 224)
    c.data.reduced_decode = False  # True: JPEGs decoded at 1/2, 1/4, 1/8 size when both crops keep >= image_size px (data/jpeg.py)
    c.data.cache_gib = 0.0  # > 0: the train split decoded once into host memory when it fits in this many GiB (else an error)
    c.data.crop_to_box = False  # True: images cut to their bounding box at read time (CUB, Cars, Aircraft)
    c.data.aircraft_train_split = "trainval"  # FGVC-Aircraft's SSL/probe training split: trainval (usual) | train
    c.data.aircraft_remove_banner = False  # True: drop Aircraft's 20-px copyright banner (torchvision, LCR keep it)
    c.data.max_image_pixels = ml_collections.config_dict.placeholder(int)  # None: Pillow's limit; larger images kept deliberately

    c.nuisance = ml_collections.ConfigDict()  # the test bed's mechanism control (data/nuisance.py); off by default
    c.nuisance.kind = "none"  # none | panel: each view shrunk onto a per-image random tile panel, plus a tint
    c.nuisance.views = "shared"  # shared (both views carry the image's own) | resampled (the oracle augmentation)
    c.nuisance.crop_fraction = 0.75  # side of the shrunk view inside the panel
    c.nuisance.tiles = 4  # the panel: tiles x tiles random colours
    c.nuisance.tint_std = 0.1  # per-image RGB offset, std in [0, 1] pixel units

    c.augment = ml_collections.ConfigDict()  # photometric, on device (MoCo v2 values)
    c.augment.jitter_prob = 0.8  # ColorJitter probability
    c.augment.brightness = 0.4  # ColorJitter brightness
    c.augment.contrast = 0.4  # ColorJitter contrast
    c.augment.saturation = 0.4  # ColorJitter saturation
    c.augment.hue = 0.1  # ColorJitter hue
    c.augment.grayscale_prob = 0.2  # RandomGrayscale probability
    c.augment.blur_prob = 0.5  # GaussianBlur probability
    c.augment.blur_sigma = (0.1, 2.0)  # GaussianBlur sigma range

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet50"  # encoder: resnet18 | resnet18_half | resnet50 (paper) | efficientnet_lite0 | resnet_tiny
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (use bfloat16 on GPU/TPU)
    c.model.bn_groups = 4  # batch-norm statistic groups = MoCo's per-GPU shuffle-BN (32 images each)
    c.model.init = "imagenet"  # paper: ImageNet start (torchvision ResNet-50, fetched once) | none | a checkpoint path (README: Checkpoints)
    c.model.init_prefix = ""  # '' finds the online encoder in a wrapped checkpoint; else its exact prefix (e.g. 'state_dict.module.encoder_q.')
    c.model.frozen_stages = 0  # EfficientNet-Lite0: stem + first N stages frozen (no gradient, running BN)
    c.model.depthwise_impl = "auto"  # EfficientNet-Lite0 depthwise conv: auto | shifted (fast on CPU) | conv
    c.model.conv_impl = "auto"  # dense convs: auto (im2col on CPU, xla elsewhere) | xla | im2col (models/conv.py)
    c.model.keep_bn_stats = False  # True: BN running statistics stay at init during SSL (evaluation uses them)

    c.moco = ml_collections.ConfigDict()
    c.moco.dim = 128  # projection (embedding) width (MoCo v2: 128)
    c.moco.head = "mlp"  # projection head: mlp (MoCo v2) | linear (MoCo v1)
    c.moco.hidden_dim = 0  # projection MLP hidden width; 0 = encoder feature width (MoCo v2)
    c.moco.temperature = 0.2  # InfoNCE tau (MoCo v2 / paper: 0.2)
    c.moco.momentum = 0.999  # EMA of the key encoder (MoCo v2: 0.999)
    c.moco.queue_size = 0  # negatives K; 0 = largest multiple of the batch within queue_fraction of train
    c.moco.queue_fraction = 0.5  # our reading: half an epoch of keys, so few are the query's own image
    c.moco.shuffle_bn = True  # permute the key batch across BN groups (MoCo's shuffle-BN)
    c.moco.symmetric = False  # symmetrised loss (MoCo v3 style); MoCo v2 is asymmetric

    c.fgpair = ml_collections.ConfigDict()  # the paper's method; every value here is our reading
    c.fgpair.alpha = 1.0  # weight of L_R, the decoder's reconstruction loss
    c.fgpair.nu = 1.0  # weight of L_Cp, the contrastive loss on synthesized pairs
    c.fgpair.criterion = "both"  # non-discriminative dims by: both | variance | gradcam | random | none
    c.fgpair.combine = "union"  # how the two criteria combine: union | intersection
    c.fgpair.variance_fraction = 0.25  # share of dims with the lowest batch variance
    c.fgpair.gradcam_fraction = 0.25  # share of dims with the lowest Grad-CAM importance
    c.fgpair.gradcam_score = "weight"  # importance: weight (mean -dL/dA) | abs_weight | grad_x_activation (A * -dL/dA, LCR's form)
    c.fgpair.relative_variance = False  # rank by var/mean^2 instead of raw variance
    c.fgpair.variance_ema_decay = 0.0  # > 0: rank by an EMA of the variance across steps
    c.fgpair.perturbation = "gaussian"  # gaussian (sigma * per-dim std) | shuffle (from other images)
    c.fgpair.sigma = 1.0  # gaussian perturbation scale, in units of each dim's batch std
    c.fgpair.warmup_epochs = 10.0  # decoder-only warm-up before L_Cp starts
    c.fgpair.ramp_epochs = 10.0  # then nu ramps linearly from 0 over this many epochs
    c.fgpair.reconstruction_trains_encoder = False  # let L_R's gradient reach the encoder
    c.fgpair.decoder_channels = (128, 64, 32, 16, 16)  # widths after each x2 upsampling block
    c.fgpair.decoder_optimizer = "adam"  # the decoder's own optimiser: adam | sgd (see methods/fgpair.py)
    c.fgpair.decoder_learning_rate = 1e-3  # its learning rate (constant)
    c.fgpair.pair_stride = 1  # every k-th image of the batch gets a synthesized pair (cost knob)
    c.fgpair.decode_from = "pooled"  # decoder input: pooled (h, our reading) | feature_map (layout kept)
    c.fgpair.pair_mode = "decoded"  # decoded: (d(h), d(h')) | residual: (x, x + d(h') - d(h)); our reading: decoded
    c.fgpair.log_gradient_share = False  # log ||d(nu_t L_Cp)/d encoder|| / ||the rest||: one more backward pass on logged steps
    c.fgpair.base = "moco"  # SSL method under the pairs, giving L_C and L_Cp's form: moco (paper) | simsiam | byol

    c.simsiam = ml_collections.ConfigDict()  # SimSiam baseline (Chen & He 2021), facebookresearch/simsiam (methods/simsiam.py)
    c.simsiam.dim = 0  # projector output width; 0 = the encoder's width (2048 at ResNet-50, SimSiam's --dim 2048)
    c.simsiam.pred_dim = 0  # predictor bottleneck width; 0 = dim / 4 (SimSiam's --pred-dim 512 at dim 2048)
    c.simsiam.hidden_dim = 0  # projector hidden width; 0 = the encoder's width (builder.py: prev_dim)
    c.simsiam.fix_pred_lr = True  # predictor at the constant peak learning rate (SimSiam's recommended --fix-pred-lr)

    c.byol = ml_collections.ConfigDict()  # BYOL baseline (Grill et al. 2020), deepmind-research byol/ (methods/byol.py)
    c.byol.base_momentum = 0.996  # tau_base of the target EMA, cosine-annealed to 1 over the run (BYOL: 0.996)
    c.byol.dim = 256  # projector / predictor output width (BYOL: 256)
    c.byol.hidden_dim = 0  # projector / predictor hidden width; 0 = twice the encoder's width (BYOL: 4096 at ResNet-50)

    c.lcr = ml_collections.ConfigDict()  # LCR baseline (CVPR 2023), ported from GANPerf/LCR (methods/lcr.py)
    c.lcr.nu = 0.01  # weight of the row-wise KL(gradient x activation map || attention) (LCR: --nu 0.01)
    c.lcr.attention_channels = 32  # 1x1 conv D -> C before the channel max (LCR: self.bilinear = 32)
    c.lcr.eval_minmax = "batch"  # evaluation attention min-max: batch (LCR's inference()) | image

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # SGD + momentum (paper)
    c.optim.learning_rate = 0.03  # peak learning rate (paper: 0.03 at batch 128)
    c.optim.momentum = 0.9  # SGD momentum
    c.optim.weight_decay = 1e-4  # L2 weight decay on all parameters (MoCo v2)
    c.optim.warmup_epochs = 0  # linear warm-up before the cosine decay (MoCo v2: none)
    c.optim.encoder_lr_scale = 1.0  # encoder's learning rate / the heads' (< 1: gentler fine-tuning)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # feature-extraction batch (global)
    c.eval.knn_every_epochs = 10  # kNN monitor cadence during training; 0 = only at the end
    c.eval.knn_k = 20  # weighted kNN neighbours
    c.eval.knn_temperature = 0.07  # weighted kNN temperature
    c.eval.probe_val_fraction = 0.2  # linear probe: held-out part of train that picks its weight decay
    c.eval.probe_weight_decays = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # probe grid (no 0: linear_probe.py)
    c.eval.recompute_bn_stats = False  # BN statistics recomputed on clean train images (hurts ImageNet starts: see features.py)
    c.eval.figures = True  # draw <workdir>/figures/ after the final evaluation (false: metrics only, seconds sooner)

    c.log_every_steps = 10  # JSONL / TensorBoard cadence
    c.checkpoint_every_steps = 500  # also saved at the end of every epoch and of training
    c.keep_checkpoints = 3  # how many recent checkpoints orbax keeps; 0 or less keeps all
    c.on_nonfinite = "stop"  # NaN/Inf loss or gradient: stop (nothing bad saved) | skip the step and go on
    # JAX's compiled programs kept for later processes (a resume, a re-evaluation, other seeds; compilation_cache.py):
    c.compilation_cache_dir = "auto"  # auto = $JAX_COMPILATION_CACHE_DIR or ~/.cache/fgpair_jax/jax | a folder | none

    if variant in ("quick", "medium", "tiny"):
        # Sized for a 2-core CPU: ImageNet-initialised EfficientNet-Lite0 (the one ImageNet encoder
        # available offline) at 112 px, stem + first 4 stages frozen (their backward pass dominates a
        # CPU step); fgpair training + evaluation within 15 minutes.
        c.num_epochs = 2
        c.global_batch_size = 64
        c.data.image_size = 112
        c.model.name = "efficientnet_lite0"
        c.model.init = "imagenet"
        c.model.frozen_stages = 4
        c.model.bn_groups = 2
        c.moco.momentum = 0.99  # few steps: a faster key encoder
        c.optim.learning_rate = 0.01  # fine-tuning pretrained weights
        c.fgpair.warmup_epochs = 1.0  # decoder warm-up, then L_Cp ramps in over half an epoch
        c.fgpair.ramp_epochs = 0.5
        c.fgpair.decoder_channels = (64, 32, 16, 8)  # the decoder must not cost more than the encoder
        c.fgpair.pair_stride = 4  # 16 synthesized pairs per batch of 64 (fgpair step 1.12x MoCo's without the next)
        c.fgpair.log_gradient_share = True  # the CPU configs study whether L_Cp acts (one more backward pass)
        c.eval.batch_size = 128
        c.eval.knn_every_epochs = 0
        c.checkpoint_every_steps = 100
    if variant == "medium":
        # The quick setup trained long enough for L_Cp to act (full weight for 12 of 16 epochs), with the
        # ImageNet BN statistics kept (quick runs otherwise lose ~5 points to them; results/README.md).
        # Run times on a 2-core CPU: results/README.md, issue 14 stage 3.
        c.num_epochs = 16
        c.model.keep_bn_stats = True
        c.fgpair.warmup_epochs = 2.0
        c.fgpair.ramp_epochs = 2.0
    if variant == "scratch":
        # The CPU test bed: what SSL itself teaches, from a random init, so that a method's gain is not
        # "erodes an ImageNet start less". ResNet-18 at half width and 80 px: full width is several times
        # slower on 2 cores, and (chosen before conv_impl existed) XLA's CPU convolutions fall off a cliff at 64 px
        # (results/README.md, test bed). 80 = 5 * 2**4 suits the decoder, and the last
        # feature map is 3x3 (LCR's attention has positions to choose from). The learning rate is the
        # usual small-data MoCo v2 value, not tuned; 40 epochs, because at 20 MoCo v2 only ties the random
        # encoder on the validation split (results/README.md).
        c.num_epochs = SCRATCH_EPOCHS
        c.global_batch_size = 128
        c.data.image_size = 80
        c.model.name = "resnet18_half"
        c.model.init = "none"
        c.model.frozen_stages = 0
        c.model.bn_groups = 4  # 32 images per shuffle-BN group, as quick's
        c.moco.queue_size = 1024  # 1-2k keys for ~2.7-3k train images (MoCo: keep K < N - B)
        c.moco.momentum = 0.99  # ~20 steps an epoch: a faster key encoder than ImageNet's 0.999
        c.optim.learning_rate = 0.06  # SGD at batch 128, cosine, no warm-up
        c.optim.weight_decay = 5e-4  # small data, from scratch (CIFAR-style MoCo recipes)
        c.fgpair.decoder_channels = (64, 32, 16, 8)  # 5 -> 80 in four x2 blocks
        c.fgpair.warmup_epochs = SCRATCH_EPOCHS / 4  # decoder-only for the first quarter, then a quarter of ramp
        c.fgpair.ramp_epochs = SCRATCH_EPOCHS / 4
        c.fgpair.pair_stride = 4  # 32 synthesized pairs per batch of 128
        c.eval.batch_size = 256
        c.eval.knn_every_epochs = 0
        c.checkpoint_every_steps = 100
    if variant == "tiny":
        # The quick run shrunk for the tests (8-channel ResNet, 32 px, batch 8, one epoch): seconds on their
        # synthetic folders, minutes on the CUB subset (results/README.md).
        c.num_epochs = 1
        c.global_batch_size = 8
        c.data.image_size = 32
        c.model.name = "resnet_tiny"
        c.model.init = "none"
        c.model.frozen_stages = 0
        # XLA's convolution: an 8-channel net at 32 px has no slow convolution to avoid, and im2col's
        # windows compile slower (the tests compile this config hundreds of times; results/README.md).
        c.model.conv_impl = "xla"
        c.moco.queue_size = 8  # below 18 train images minus a batch: no query meets its own image (moco#87)
        c.moco.momentum = 0.9
        c.optim.learning_rate = 0.05
        c.fgpair.decoder_channels = (16, 8)
        c.fgpair.pair_stride = 1
        c.fgpair.warmup_epochs = 0.5  # L_Cp ramps in within the one epoch (quick's 1.0 would never start it)
        c.fgpair.ramp_epochs = 0.5
        c.fgpair.log_gradient_share = False  # tests that need it switch it on
        c.eval.batch_size = 16
        c.eval.knn_k = 3  # tiny folders have 18 train images
        c.log_every_steps = 1
    return c
