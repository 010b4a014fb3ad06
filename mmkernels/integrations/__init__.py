"""Adapters that put the mmkernels ops under other libraries' models (imported on demand)."""
