"""Text to tokens: reading corpora (`corpus`), the tokenizer (`tokenizer`), writing prepared data
(`prepare`) and reading it back (`shards`)."""
