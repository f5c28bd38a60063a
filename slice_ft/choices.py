"""Names the command line and the modules share, in a module that imports nothing heavy (so `--help` and flag
errors answer before torch, diffusers and accelerate load)."""

TINY = "tiny"  # --pretrained_model_name_or_path value: tiny random Wan components built in memory
TINY_MAX_SEQUENCE_LENGTH = 16  # pass as `max_sequence_length` to the pipeline; UMT5 has relative positions, any works
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adafactor")
SAMPLING_METHODS: tuple[str, ...] = ("uniform", "sigmoid", "shift", "logit_normal")
WEIGHTING_SCHEMES: tuple[str, ...] = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULERS: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial")
PRESERVATION_LOSSES: tuple[str, ...] = ("distill", "flow")  # slice_ft.preservation.LOSS_MODES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
