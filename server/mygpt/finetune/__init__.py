"""Fine-tuning: files, jobs, and the QLoRA trainer that turns a tenant's chat data into an adapter."""
