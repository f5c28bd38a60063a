"""The slice adapter's files on disk, apart from the tuner: the adapter folder and its PEFT io, safetensors streaming,
key names, deltas read from a folder, merge, export and reports. Only `io` imports PEFT."""
