"""Prompts that exercise CLIP tokenizers: unicode, accents, emoji, punctuation, whitespace runs, HTML
entities, mojibake, special-token text, over-long prompts."""

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "An astronaut riding a horse, oil painting, trending on artstation",
    "Café naïve résumé façade Ångström Øresund Dvořák",                  # accents
    "東京の夜景、ネオン 서울 北京烤鸭",                                     # CJK
    "a 🐱 and a 🐶 👩‍🚀 🇫🇷 ❤️",                                        # emoji, ZWJ sequences, flags
    "wow!!! ??? ... ,,, ;-) :D --- ***",                                 # punctuation runs
    "tabs\tand\nnewlines\r\n  and   spaces\u00a0nbsp\u2003em\u3000ideographic",   # whitespace runs
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &amp;amp; &#39;x&#39; &eacute;",     # HTML entities
    "“curly quotes” ‘single’ – en dash — em dash …",
    "Ã©tÃ© cafÃ© â€œmojibakeâ€\x9d",                                     # mojibake: ftfy repairs it
    "3.14159 2024-01-01 1,000,000 007 ½ ² Ⅻ ٣",                         # numbers
    "İstanbul ſtraße DŽ ǅ ß ΣΑΣ 'S 'LL we're I'M",                       # case folding corners
    "<|startoftext|> tokens <|endoftext|> in text <start_of_text> <end_of_text>",
    "control\x00chars\x07and\x1cseparators\x1f\x85\u2028\u2029",
    "combining e\u0301 a\u0308 Zalgo z\u0351\u0360\u0322",
    "word " * 100,                                                       # over-long: cut, end-of-text kept
    "supercalifragilisticexpialidocious" * 20,
    "x" * 500,
]
# where the two libraries read the prompt differently: each names its own special tokens
SPECIAL = {"<|startoftext|> tokens <|endoftext|> in text <start_of_text> <end_of_text>"}
