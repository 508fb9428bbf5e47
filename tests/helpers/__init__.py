"""What several test modules share: data, runs and checks, imported as ``tests.helpers.<module>``."""
