"""fedclip.device_agent: the torch-free device agent."""
