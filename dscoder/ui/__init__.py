"""Everything that writes to the terminal: consoles, streaming Markdown, the chat REPL."""
