"""PEFT's own generic tuner tests, unmodified (Apache-2.0, the HuggingFace team): tests/test_custom_models.py (as
custom_models.py, so pytest does not collect its thousands of cases for other methods), testing_common.py and
testing_utils.py of huggingface/peft at commit
 5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40 (the newest snapshot available; it imports and runs against the
installed peft 0.21). tests/test_peft_generic.py runs their TestPeftCustomModel with SliceConfig cases, as PEFT's
repository does for each of its methods."""
