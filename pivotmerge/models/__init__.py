"""Model classes the project defines itself, as transformers models: the modality-specific
vision-language transformer of Sung et al. (2023) and its modality-agnostic counterpart.

Importing `pivotmerge.models.multiway` registers them with transformers' Auto classes, so
their folders load with `AutoModel.from_pretrained` and no remote code.

May import: nothing."""
