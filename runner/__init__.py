"""assessment-runtime runner: one process per job; imports little, forked from the zygote."""
