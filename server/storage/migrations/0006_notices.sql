-- Notices (issue 12): a user hears about changes to their second factor by email, through the
-- same outbox as the codes. A notice is a challenges row of purpose 'notice' whose `notice`
-- names the change (method_added, contact_changed, ...); its code_ciphertext holds the sealed
-- detail the worker renders, wiped once sent. A pending change of contact is a row of purpose
-- 'contact' whose destination is the new address, in force once its code is confirmed.
ALTER TABLE challenges ADD COLUMN notice TEXT;
