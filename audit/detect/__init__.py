"""Detection: kNN join, within-prompt cliques, copy similarity, verification, prompt scores."""
