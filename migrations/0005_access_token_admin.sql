-- §8, access-token administration: `access-tokens list` shows each token by a
-- prefix of its ID (at most 8 characters and a quarter of the ID, never the
-- whole: the ID is a bearer secret) and when it was made. Tokens stored before
-- this migration have only their hash: their prefix is unknown ('').
ALTER TABLE access_tokens ADD COLUMN id_prefix text NOT NULL DEFAULT ''
    CHECK (length(id_prefix) <= 8);
ALTER TABLE access_tokens ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
