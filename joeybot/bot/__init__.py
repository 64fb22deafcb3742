"""The Telegram front end (`joeybot bot`): takes messages in, queues them for the workers.

The bot never loads the model. Routers, in the order the dispatcher tries them:
`commands` (/start, /help, /reset, /stats), then `messages` (text, and everything else).
"""
