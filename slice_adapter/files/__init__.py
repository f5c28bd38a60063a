"""The slice adapter's files on disk, apart from the tuner: the adapter folder and its PEFT io, safetensors streaming
and dtypes, key names, deltas read from a folder, merge, LoRA export, Wan2GP definitions and reports. Only `io`
imports PEFT; merge, deltas, reports and Wan2GP definitions do not import torch."""
