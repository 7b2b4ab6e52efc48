"""Examples of a user's own code plugged into the harness by ``package.module:function`` names."""
