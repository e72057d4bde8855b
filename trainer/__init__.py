"""The "learn" half of IRO: tasks, rewards, Monte-Carlo returns and value training."""
