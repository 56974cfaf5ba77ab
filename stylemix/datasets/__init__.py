"""Stage 1-2, upload -> dataset: safe intake of uploads, the image helpers, captioning, and the dataset
format (its writer and its one reader).  See docs/architecture.md."""
