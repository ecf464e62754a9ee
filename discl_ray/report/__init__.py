"""Paper-style tables and plots from MLflow."""
