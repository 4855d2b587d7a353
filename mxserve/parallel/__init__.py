"""Multi-GPU layouts of the mixed-precision experts: expert and tensor parallel sharding."""
