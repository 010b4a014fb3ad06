"""Data sets: AV-MNIST with questions (MNIST digits + spoken digits + text questions)."""
from mmkernels.data.avmnist import (ANSWERS, QUESTION_TYPES, TEMPLATES, AVMNISTConfig, AVMNISTQA,
                                    DataFormatError, build_avmnist, default_cache_dir, load_split)
from mmkernels.data.speech import MissingPackageError, load_audio, scan_fsdd, split_speakers

__all__ = ["ANSWERS", "QUESTION_TYPES", "TEMPLATES", "AVMNISTConfig", "AVMNISTQA", "DataFormatError",
           "build_avmnist", "default_cache_dir", "load_split", "MissingPackageError", "load_audio",
           "scan_fsdd", "split_speakers"]
