"""Reading and writing model repos: lazy safetensors reading, architecture tables (which
component and layer a tensor is), the streaming shard writer, output folders.

May import: spec (the component names), errors. Nothing of the plan, the run or the service."""
