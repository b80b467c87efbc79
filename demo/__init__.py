"""The demo worlds (synthetic captioned videos), their tiny models and how those are trained."""
