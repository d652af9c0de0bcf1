"""User-facing generation pipelines."""

from flowalign.pipelines.text_to_media import FlowPipeline, GenerationOutput

__all__ = ["FlowPipeline", "GenerationOutput"]
