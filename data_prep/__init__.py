"""Raw task data → pre-tokenized, content-hashed Arrow shards, and the packing plans that batch them."""
